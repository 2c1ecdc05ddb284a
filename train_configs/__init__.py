"""The shipped TOML configs, installed as package data so that a config can be named without a checkout."""
