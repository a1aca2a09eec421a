"""Where sandboxes run: `base` is the interface, `docker` the Docker Engine backend."""
