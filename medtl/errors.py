"""User-facing errors: one clear line, no traceback, and an exit code that says whether a retry can help.

Exit 2 (MedtlError, ConfigError): a usage or config error. The command line, the job config or the
inputs they name are wrong, found before any work starts; only a person can fix it, so a scheduler
must not retry (the Kubernetes Jobs fail fast on 2, see k8s/). Exit 1 (RunFailure): the work started
and failed: damaged data, a non-finite loss, ranks out of step or stalled, storage out of reach.
Exit 143 (Terminated): SIGTERM stopped training between two steps; the same command resumes.
"""

EXIT_USAGE = 2
EXIT_RUNTIME = 1
EXIT_TERMINATED = 128 + 15  # the shell's code for SIGTERM: the job was stopped, not broken


class MedtlError(Exception):
    """A usage or config error, found before any work starts, with the fix in the message (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(MedtlError):
    """A job config that cannot be loaded: unknown key, wrong type, bad value."""


class RunFailure(MedtlError):
    """A failure met while the work runs (damaged data, non-finite training, a dead or stalled rank): exit 1."""

    exit_code = EXIT_RUNTIME


class Terminated(MedtlError):
    """SIGTERM asked the run to stop; it stopped at a safe point and can be resumed (exit 143)."""

    exit_code = EXIT_TERMINATED
