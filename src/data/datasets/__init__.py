"""One reader per dataset layout; each turns a folder into train/val/test lists of Samples."""
