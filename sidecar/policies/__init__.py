"""One module per policy key in the config: `<Name>Config` lives in config.py, the policy here."""
