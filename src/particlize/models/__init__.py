"""Reference models shipped with particlize."""
