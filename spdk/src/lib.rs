//! Block storage: the tile read interface and its backends.
