_instruments = ("starlette >= 0.27",)
