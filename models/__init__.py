"""Models built on vkernels ops."""
