"""What a process runs on: stop signals, helper processes, local files, the device, the process group."""
