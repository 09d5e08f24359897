"""Exception types. Library code raises these; only the CLI turns them into exit codes."""


class ArtrtError(Exception):
    """Base class of every error a user can cause or act on."""


class PackageError(ArtrtError):
    """A package directory is missing, corrupt, or its manifest is invalid."""


class ConfigError(ArtrtError):
    """A model or scheduler configuration uses a setting artrt does not support."""


class InputError(ArtrtError):
    """A generation argument is out of range (size, steps, switch, sampler, ...)."""


class EngineError(ArtrtError):
    """A backend failed to load or run a component."""
