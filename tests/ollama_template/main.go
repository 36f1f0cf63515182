// Renders Modelfile templates as Ollama does (server/routes.go and template/template.go, Ollama 0.5+): a request
// without a system message gets the Modelfile's SYSTEM first; consecutive messages of one role are joined with a
// blank line; the template runs with .System (the system messages, joined) and .Messages.
//
// stdin: {"template": "...", "system": "...", "conversations": [[{"role": ..., "content": ...}, ...], ...]}
// stdout: a JSON list of the rendered prompts.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		msg := msgs[i]
		if msg.Role == "system" {
			system = append(system, msg.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msg.Role {
			collated[len(collated)-1].Content += "\n\n" + msg.Content
		} else {
			collated = append(collated, &msg)
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Parse(req.Template))
	out := []string{}
	for _, msgs := range req.Conversations {
		if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
		}
		system, messages := collate(msgs)
		var b strings.Builder
		if err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
