//! Sweep files (TOML) → validated, expanded trial configs. (in progress)
