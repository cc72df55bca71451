from tests.transport.support import logs

__all__ = ["logs"]
