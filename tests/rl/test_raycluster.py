"""What a Ray job ships and how long it waits: the runtime-env builders for a source checkout
vs an installed wheel (pure functions), the connect-timeout setting, and the fast preflight
(`check_ray_address`) that turns an unreachable address into a clear error."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from training.raycluster import (
    PROJECT_PACKAGES,
    REPO_ROOT,
    WORKING_DIR_EXCLUDES,
    RayConnectError,
    check_ray_address,
    cluster_runtime_env,
    connect_timeout,
    is_source_checkout,
    local_runtime_env,
)


def _packages(root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")


def test_a_source_checkout_ships_as_working_dir_without_envs_and_weights(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "prefloop"\n')
    _packages(tmp_path, PROJECT_PACKAGES)
    assert is_source_checkout(tmp_path)
    assert cluster_runtime_env(tmp_path) == {"working_dir": str(tmp_path),
                                             "excludes": WORKING_DIR_EXCLUDES}
    assert ".venv" in WORKING_DIR_EXCLUDES and "*.safetensors" in WORKING_DIR_EXCLUDES
    # this repository is one
    assert cluster_runtime_env() == {"working_dir": str(REPO_ROOT),
                                     "excludes": WORKING_DIR_EXCLUDES}


def test_an_installed_layout_ships_only_prefloops_packages(tmp_path):
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    _packages(site, (*PROJECT_PACKAGES, "numpy", "torch", "ray"))
    (site / "cli.py").write_text("")
    (site / "pyproject.toml").write_text('[project]\nname = "somebody-else"\n')  # not ours
    assert not is_source_checkout(site)
    assert cluster_runtime_env(site) == {
        "py_modules": [str(site / name) for name in
                       ("app", "feedback", "labeling", "loop", "store", "training")],
        "excludes": ["**/__pycache__"]}


def test_an_installed_layout_without_prefloop_is_an_error(tmp_path):
    _packages(tmp_path, ("numpy",))
    with pytest.raises(RayConnectError) as info:
        cluster_runtime_env(tmp_path)
    assert str(info.value) == f"no prefloop package found under {tmp_path} to ship to the cluster"


def test_local_runtime_env_puts_only_a_checkout_on_the_pythonpath(tmp_path):
    checkout = tmp_path / "src"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "prefloop"\n')
    assert local_runtime_env(checkout, "/extra") == {
        "env_vars": {"PYTHONPATH": f"{checkout}:/extra"}}
    assert local_runtime_env(checkout, "") == {"env_vars": {"PYTHONPATH": str(checkout)}}
    assert local_runtime_env(tmp_path / "site-packages", "") == {}
    assert local_runtime_env(tmp_path / "site-packages", "/extra") == {
        "env_vars": {"PYTHONPATH": "/extra"}}


@pytest.mark.parametrize(("raw", "expected"), [(None, 30.0), ("", 30.0), (" 2.5 ", 2.5)])
def test_connect_timeout_setting(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("PREFLOOP_RAY_CONNECT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PREFLOOP_RAY_CONNECT_TIMEOUT", raw)
    assert connect_timeout() == expected


@pytest.mark.parametrize(("raw", "message"), [
    ("soon", "PREFLOOP_RAY_CONNECT_TIMEOUT='soon' is not a number of seconds"),
    ("0", "PREFLOOP_RAY_CONNECT_TIMEOUT='0' must be a positive number of seconds"),
    ("nan", "PREFLOOP_RAY_CONNECT_TIMEOUT='nan' must be a positive number of seconds"),
    ("inf", "PREFLOOP_RAY_CONNECT_TIMEOUT='inf' must be a positive number of seconds"),
])
def test_bad_connect_timeout_settings_are_refused(monkeypatch, raw, message):
    monkeypatch.setenv("PREFLOOP_RAY_CONNECT_TIMEOUT", raw)
    with pytest.raises(RayConnectError) as info:
        connect_timeout()
    assert str(info.value) == message


def test_preflight_names_the_address_it_cannot_reach():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens
    for address in (f"ray://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        with pytest.raises(RayConnectError) as info:
            check_ray_address(address, timeout=5)
        assert str(info.value) == f"no Ray cluster at {address}: Connection refused"
    for address in ("ray://nohost", "127.0.0.1", "ray://h:port"):
        with pytest.raises(RayConnectError) as info:
            check_ray_address(address, timeout=5)
        assert str(info.value) == (f"Ray address {address!r} is not ray://HOST:PORT, HOST:PORT "
                                   "or auto")


def test_preflight_accepts_a_listening_plain_address():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=5)  # no error


def test_auto_without_a_cluster_on_this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray instance runs in this process; auto would find it")
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine; auto would find it")
    with pytest.raises(RayConnectError) as info:
        check_ray_address("auto", timeout=5)
    assert str(info.value) == ("--ray-address auto: no running Ray cluster found on this "
                               "machine (start one with `ray start --head`, or give HOST:6379)")
