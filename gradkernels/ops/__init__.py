"""Launch wrappers: validate -> allocate -> grid -> launch. They accept preallocated outputs."""
