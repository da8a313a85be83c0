"""The mount: a pure-Python filesystem core over version views, and a thin FUSE adapter."""
