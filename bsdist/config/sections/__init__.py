"""One module per YAML section: its keys, as fields of a frozen dataclass (see bsdist.config.fields)."""
