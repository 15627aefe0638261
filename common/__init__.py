"""Bottom layer shared by the entry points (torch and the standard library only):
process groups and devices, crash-safe file writes, image files."""
