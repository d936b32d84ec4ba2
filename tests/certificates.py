"""Certificates made in a test (TLS and mutual TLS): the library's CA, one day valid,
writing only inside the directory given."""

from modelplane.kernel.certificates import CertificateAuthority, Issued

__all__ = ["CertificateAuthority", "Issued"]
