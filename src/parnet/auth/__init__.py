"""Authentication: TLS 1.3 plus SRP-6a bound to the channel (see SECURITY.md).

- ``sb64``: GnuTLS's SRP base64 codec.
- ``srp``: the sans-IO login (``SrpClient``, ``SrpServer``) and its math.
- ``keyfile``: the ``tpasswd`` / ``tpasswd.conf`` / ``user_passwd`` formats.
- ``keygen``: ``parnet keygen`` (``parallel_generate_srp_data``).
- ``tls``: TLS 1.3 contexts, each server's certificate, the channel binding.
- ``pairkeys``: pairwise keys and tags for data links.
"""
