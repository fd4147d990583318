"""The api_grpc service: payment.v1.PaymentService over grpc.aio (issue 5). See bootstrap.py."""
