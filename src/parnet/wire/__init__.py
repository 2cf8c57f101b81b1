"""Wire layer: frames and serialization. Pure: bytes in, frames and values out (no sockets, no threads)."""
