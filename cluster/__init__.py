"""elmforge cluster side: config composition, the command line, Ray runtime and launch of training."""
