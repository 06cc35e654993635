"""The console's page routers, one module per page (each ``router`` is included by ``api.console.app``)."""
