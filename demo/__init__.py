"""The embedded example, apart from the product: the IoT fleet generator (`mlops generate`)
and `make demo`, the closed loop over its data. Nothing in mlops/, assets/, sensors/ or
orchestration/ imports it: the platform knows only specs and landing files."""
