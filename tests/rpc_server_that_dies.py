"""A real TVM RPC server (``tvm.exec.rpc_server``) that crashes in the middle of a trial.

The operations test needs "a server that dies mid-run" without racing the tuner: a watcher that
polls for session processes from outside races sessions that last milliseconds, and a server that
dies while a client connects is invisible (TVM's tracker client retries on another server).
So the crash comes from inside: every server started by this script counts the
sessions it accepts in one file shared by all of them (under ``flock``). The session that is number
``--die-on-session`` SIGKILLs the whole server (main process, popen worker, itself) when the client
asks it to load the uploaded module: the trial is in flight and its measurement is lost.

The hook runs inside TVM's popen worker, the process that owns the listening socket and forks one
process per session; cloudpickle carries it there by value because it is defined in ``__main__``.

    python tests/rpc_server_that_dies.py --die-on-session 3 --session-count FILE \
        --host 127.0.0.1 --port 9091 --port-end 9092 --tracker 127.0.0.1:9190 --key cpu-test
"""

from __future__ import annotations

import argparse
import logging


def crash_in_session(count_file: str, die_on: int):
    def install() -> None:
        import fcntl
        import os
        import signal

        import tvm.rpc.server as server
        import tvm_ffi

        serving, server_env = server._serving, server._server_env
        doomed = {"pids": None}  # set before the session process is forked, read inside it

        def _serving(sock, addr, opts, load_library):
            with open(count_file, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"{os.getpid()}\n")
                f.flush()
                f.seek(0)
                number = len(f.read().splitlines())
            doomed["pids"] = (os.getppid(), os.getpid()) if number == die_on else None
            return serving(sock, addr, opts, load_library)

        def _server_env(load_library, work_path=None):
            temp = server_env(load_library, work_path)
            if doomed["pids"] is not None:

                @tvm_ffi.register_global_func("tvm.rpc.server.load_module", override=True)
                def load_module(file_name):
                    for pid in (*doomed["pids"], os.getpid()):
                        os.kill(pid, signal.SIGKILL)

            return temp

        server._serving, server._server_env = _serving, _server_env

    return install


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--port-end", type=int, required=True)
    p.add_argument("--tracker", required=True, help="HOST:PORT")
    p.add_argument("--key", required=True)
    p.add_argument("--session-count", required=True, help="file shared by the servers")
    p.add_argument("--die-on-session", type=int, required=True)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)

    from tvm import rpc

    host, port = a.tracker.rsplit(":", 1)
    server = rpc.Server(
        a.host,
        a.port,
        a.port_end,
        key=a.key,
        tracker_addr=(host, int(port)),
        server_init_callback=crash_in_session(a.session_count, a.die_on_session),
    )
    server.proc.join()


if __name__ == "__main__":
    main()
