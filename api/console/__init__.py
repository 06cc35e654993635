"""The web console: sign in with the API token, then label, train, evaluate and try models in a browser.

Served by the control plane under ``/console`` (``/`` leads there), as its own
mounted application so that its HTML error pages, cookies and security headers
never touch the REST API. It calls the same services and route functions as the
REST API, in-process, never the API over HTTP.

Where things are::

    app.py          build_console(): the mounted app (pages, static files, error pages, headers)
    security.py     signed session cookies, CSRF tokens, Content-Security-Policy and other headers
    deps.py         the signed-in viewer (ViewerDep), the CSRF check (CsrfChecked), the services
    rendering.py    the Jinja2 environment (autoescaped), page rendering, flash messages
    actions.py      every change a page makes, through the REST routes' own functions and services
    queries.py      what pages read (counts per task/label, the image grid), in few queries
    evaluation.py   a version's metrics as the evaluation page draws them
    charts.py       geometry of the server-rendered SVG charts
    uploads.py      many files or a zip into training images, with the summary the page shows
    training_form.py the train options, made from the API's TrainRequest (defaults shown)
    pages/          one router per page: auth, tasks, labels, images, training, versions,
                    try_it, account
    templates/      Jinja2 templates (base.html has the blocks later pages extend)
    static/         console.css, console.js and the vendored htmx (static/vendor/NOTICE.md)
"""

from __future__ import annotations

from api.console.app import install

__all__ = ["install"]
