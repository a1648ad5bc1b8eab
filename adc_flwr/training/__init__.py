"""One split-learning step, free of Flower: the workers and their loss, the modules and
optimizer state each side trains, central evaluation, devices and precision."""
