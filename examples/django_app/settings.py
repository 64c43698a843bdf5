"""Settings of the example Django app: one database, from $EDM_SCHED_DSN.

ATOMIC_REQUESTS wraps every request in a transaction; the views pass Django's
psycopg 3 connection to edm-sched as conn=, so a campaign commits or rolls
back with the request's own rows.
"""

import os

from psycopg import conninfo

_db = conninfo.conninfo_to_dict(os.environ["EDM_SCHED_DSN"])

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
USE_TZ = True
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 when installed (Django 4.2+)
        "NAME": _db.get("dbname", ""),
        "USER": _db.get("user", ""),
        "PASSWORD": _db.get("password", ""),
        "HOST": _db.get("host", ""),
        "PORT": _db.get("port", ""),
        "ATOMIC_REQUESTS": True,
    }
}
