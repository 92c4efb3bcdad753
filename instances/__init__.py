"""oTree instances: their desired state, releases, backups and runtimes (filled by the instance issues)."""
