"""HTTP/1.1 as the sidecar reads and writes it, without I/O: the request model the policies
see (`RequestHead`), raw header lists with a case-insensitive view, the hop-by-hop rules, the
once-a-second Date value, and the request head sent upstream (`forwarding`)."""
