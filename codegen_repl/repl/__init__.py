"""The terminal front end: the chat loop and its wiring (`chat`), and how turns are drawn
(`render`).
"""
