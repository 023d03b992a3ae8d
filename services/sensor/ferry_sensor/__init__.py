"""The sensor service: takes in a host's service-plane events and dispatches them in time order."""
