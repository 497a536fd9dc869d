"""negtrace: where do medical vision-language models process negation?"""
