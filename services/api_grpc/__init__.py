"""The api_grpc service. Not built yet: see issue 5."""
