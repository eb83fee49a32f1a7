from .registry import Family, register, get, load_all, detect_family, UnknownModelError  # noqa: F401
