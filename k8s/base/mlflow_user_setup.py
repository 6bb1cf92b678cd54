"""Create the MLflow user the Ray pods log in as, with EDIT on every experiment, and nothing more.

Run by the Job `paceray-mlflow-user` (mlflow-user.yaml) through MLflow's basic-auth REST API. It
logs in as the admin (MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, Secret
paceray-mlflow-auth, the server's own bootstrap credentials) and creates the user named by
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, the Ray pods' credentials (Secret
paceray-mlflow-ray). Where that user exists it sets its password from the Secret, so a rotation
is a re-run. The user is no admin: `default_permission = READ` (basic_auth.ini) plus an EDIT grant
on experiment "*" lets it create experiments and runs and log to any experiment; it cannot manage
users, permissions, or delete experiments it did not create.

Standard library only: it runs in the paceray image, as the server does, with no extra package.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

WAIT_TIMEOUT_S = float(os.environ.get("MLFLOW_WAIT_TIMEOUT_S", "1200"))  # first start: image pulls, PostgreSQL
REQUEST_TIMEOUT_S = 20.0
USERS = "/api/2.0/mlflow/users"
PERMISSIONS = "/api/3.0/mlflow/users/permissions"
EDIT_EVERY_EXPERIMENT = {"resource_type": "experiment", "resource_id": "*", "permission": "EDIT"}


class SetupError(Exception):
    pass


def call(uri: str, method: str, path: str, credentials: tuple[str, str] | None = None,
         body: dict | None = None) -> tuple[int, dict]:
    """One request; (status, JSON body or {}). HTTP errors are answers, not exceptions."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(uri + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    try:
        return status, json.loads(text or b"{}")
    except ValueError:
        return status, {"message": text[:300].decode(errors="replace")}


def wait_for_server(uri: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        try:
            if call(uri, "GET", "/health")[0] == 200:
                return
            reason = "not healthy yet"
        except OSError as error:  # URLError included: DNS, refused, timeout
            reason = str(getattr(error, "reason", error))
        if time.monotonic() > deadline:
            raise SetupError(f"MLflow at {uri} did not answer /health within {WAIT_TIMEOUT_S:.0f} s ({reason})")
        time.sleep(5)


def expect(answer: tuple[int, dict], what: str) -> dict:
    status, body = answer
    if status != 200:
        raise SetupError(f"{what}: HTTP {status} {body.get('message') or body}")
    return body


def grant_edit_on_every_experiment(uri: str, admin: tuple[str, str], username: str) -> None:
    """The grant, exactly EDIT: kept where it is, replaced where an admin changed it."""
    grant = {"username": username, **EDIT_EVERY_EXPERIMENT}
    status, body = call(uri, "POST", f"{PERMISSIONS}/grant", admin, grant)
    if status == 200:
        return
    if body.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise SetupError(f"grant {username!r} EDIT on every experiment: HTTP {status} {body.get('message') or body}")
    query = {"username": username, "resource_type": "experiment", "resource_id": "*"}
    held = expect(call(uri, "GET", f"{PERMISSIONS}/get?" + urllib.parse.urlencode(query), admin),
                  f"read the permission of {username!r} on every experiment").get("permission")
    if held != "EDIT":
        expect(call(uri, "POST", f"{PERMISSIONS}/revoke", admin, query), f"revoke {held} from {username!r}")
        expect(call(uri, "POST", f"{PERMISSIONS}/grant", admin, grant), f"grant {username!r} EDIT on every experiment")


def setup(uri: str, admin: tuple[str, str], user: tuple[str, str]) -> None:
    username, password = user
    if username == admin[0]:
        raise SetupError(f"the Ray pods' MLflow user {username!r} is the admin: give paceray-mlflow-ray "
                         "another username than paceray-mlflow-auth")
    if len(password) < 12:
        raise SetupError("the Ray pods' MLflow password is shorter than 12 characters (MLflow refuses it)")
    wait_for_server(uri)
    status, body = call(uri, "GET", f"{USERS}/get?" + urllib.parse.urlencode({"username": username}), admin)
    if status == 200:
        if body["user"].get("is_admin"):
            raise SetupError(f"MLflow user {username!r} is an admin; the Ray pods must not be")
        expect(call(uri, "PATCH", f"{USERS}/update-password", admin, {"username": username, "password": password}),
               f"set the password of {username!r}")
        print(f"MLflow user {username!r} exists: password set from the Secret", flush=True)
    elif status == 404:
        expect(call(uri, "POST", f"{USERS}/create", admin, {"username": username, "password": password}),
               f"create {username!r}")
        print(f"MLflow user {username!r} created", flush=True)
    else:
        raise SetupError(f"look up {username!r} as admin {admin[0]!r}: HTTP {status} {body.get('message') or body}")
    grant_edit_on_every_experiment(uri, admin, username)
    me = expect(call(uri, "GET", f"{USERS}/current", user), f"log in as {username!r}")
    if me.get("user", {}).get("username") != username or me["user"].get("is_admin"):
        raise SetupError(f"logged in as {username!r}, MLflow answered {me}")
    print(f"MLflow user {username!r}: EDIT on every experiment, not an admin", flush=True)


def main() -> int:
    env = os.environ
    try:
        setup(env["MLFLOW_TRACKING_URI"].rstrip("/"),
              (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]),
              (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]))
    except KeyError as error:
        print(f"mlflow_user_setup: environment variable {error} is not set", file=sys.stderr, flush=True)
        return 1
    except SetupError as error:
        print(f"mlflow_user_setup: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
