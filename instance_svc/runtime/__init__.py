"""Runtimes run instances: `local` (bubblewrap sandboxes, the default) and `kubevirt` (a later issue)."""
