"""The simulated client population: per-client links, devices and reliability, and the
clock that turns bytes and FLOPs into simulated seconds."""
