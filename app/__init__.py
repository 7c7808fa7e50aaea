"""Lookout: HTTP API, billing and the command line, on top of `streams` and `provisioning`.

No face: importing any module of app/ runs this file first, so a face here would load the whole
application under every module of the layers below it (`app.application.create_app`)."""
