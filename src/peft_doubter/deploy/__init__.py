"""Deploy: the GGUF sidecar format (one table of key and tensor names, shared with the C++ loader), writing and
reading sidecars, a numpy reference of the forward pass, and the patched llama.cpp runtime."""
