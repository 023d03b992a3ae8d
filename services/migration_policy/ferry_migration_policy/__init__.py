"""The migration-policy service: admission of incoming migrations and resource reservations."""
