"""The one exception type every user-facing failure becomes: a single line naming the cause."""


class UmigError(Exception):
    """A failure with a message fit for one line on stderr."""


class Refused(UmigError):
    """The process cannot be moved; known before anything was frozen."""


class DamagedImage(UmigError):
    """An image or stream failed its checksums or its framing."""
