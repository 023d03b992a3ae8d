"""The migration coordinator: runs each migration as a saga across the host services."""
