"""The hypervisor-adapter service: starts, stops and live-migrates VMs through a driver."""
