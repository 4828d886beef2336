"""Quality evaluation of KV merging through the real engine (tasks generated locally)."""
