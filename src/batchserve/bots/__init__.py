"""Chat doors: a Telegram bot and a Slack app, each a separate process that is a client of a
batchserve URL through the jobs API (`client`), sharing one conversation core (`chat`): limits
per chat and user, options, a status message that follows the job, the image. No torch, no
server code is imported here."""
