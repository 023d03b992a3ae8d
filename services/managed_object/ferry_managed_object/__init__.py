"""The managed-object service: elements, embots and their policies, modules, and their state."""
