"""Build of the optional C extension; every piece of metadata stays in pyproject.toml.

``kakehashi.core._dgaead`` seals and opens batches of datagrams with one OpenSSL cipher
context per direction (see src/kakehashi/core/_dgaead.c for why). It is optional: where a
C compiler, the OpenSSL headers (Debian: libssl-dev) or Python's headers are missing, the
build of the extension fails, the install goes on without it, and
:class:`kakehashi.core.crypto.DatagramChannel` uses its Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kakehashi.core._dgaead",
            sources=["src/kakehashi/core/_dgaead.c"],
            libraries=["crypto"],
            extra_compile_args=["-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
