"""The SQL layer: schema, migrations, claim, fairness, expansion, security, plans."""
