"""Serve MiniCPM-2B over HTTP: `python api.py`, then POST / on port 6006 (see README.md).

`python api.py --help` lists every setting; `python api.py --demo` serves a tiny random-weight
model on CPU, for trying the server without a GPU or a download.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from minicpm_server.exceptions import PortInUseError, StartupError
    from minicpm_server.settings import parse_settings

    log = logging.getLogger("minicpm_server")
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
        )
        if settings.demo:
            from minicpm_server.model.tiny import demo_cache_dir, demo_settings

            log.info("demo mode: preparing the tiny random-weight checkpoint in %s", demo_cache_dir())
            settings = demo_settings(settings)
            log.warning("demo mode: the model has random weights, so its answers are random text")
        # Refuse what can be known before listening, so these failures are one line and exit 2.
        from minicpm_server.engine import choose_backend
        from minicpm_server.model.checkpoint import preflight

        checked = preflight(settings.model_path, settings.device)
        choose_backend(settings.engine, checked.device.type)  # --engine vllm without vLLM fails here
        _check_port_free(settings.host, settings.port)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, PortInUseError) else 2
    return _serve(settings, checked)


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before loading anything, instead of uvicorn's bind error mid-start-up."""
    import socket

    from minicpm_server.exceptions import PortInUseError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUseError(
                f"cannot listen on {host}:{port}: {exc.strerror} (another server, perhaps an earlier api.py, "
                "is using the port; stop it or pass --port)"
            ) from None


def _serve(settings, checked) -> int:
    import uvicorn

    from minicpm_server.api.app import create_app
    from minicpm_server.api.connections import guarded_protocol
    from minicpm_server.api.draining import DrainingServer

    fatal: list[str] = []
    server: DrainingServer | None = None

    def stop_on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop_on_fatal, preflight=checked)
    _raise_open_files_limit(settings.max_connections)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.read_timeout, settings.max_connections, app.state.service.metrics.refused),
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]  (uvicorn takes any number)
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.service, settings.shutdown_timeout)
    server.run()
    if fatal:
        print(f"error: {fatal[0]}", file=sys.stderr)
        # 2: the server never became ready; 3: its engine died while serving (a supervisor restarts it)
        return 3 if app.state.service.was_ready else 2
    return 0 if server.started else 1


def _raise_open_files_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: make room for --max-connections (and the model's
    files) under the soft limit, as far as the hard limit allows."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        if new_soft < wanted:
            logging.getLogger("minicpm_server").warning(
                "open files limit is %d: fewer than --max-connections %d can be served; raise `ulimit -n`",
                new_soft,
                max_connections,
            )


if __name__ == "__main__":
    sys.exit(main())
