"""HTTP plumbing shared by the routes: slash-agnostic routing, bodies, query values, pages, the URL guard."""
