// Renders a Modelfile TEMPLATE for conversations the way Ollama does, with Go's own text/template, so that
// tests/tasks/test_ollama.py can compare the text with our Jinja chat template's:
//
//	go run ollama_render.go < request.json > rendered.json
//
// request.json: {"template": "...", "conversations": [[{"role": "user", "content": "..."}, ...], ...]}
// rendered.json: [{"text": "...", "error": ""}, ...], one per conversation (error: the template's execution error).
//
// What Ollama does before and around the template (its template/template.go, Parse and Execute, for a template
// that reads .Messages): parse with missingkey=zero and a `json` function; merge consecutive messages of one role
// into one, their contents joined by a blank line; join the system messages into .System; execute with
// .Messages, .System, .Tools (none here), an empty .Response and .Think false.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type rendered struct {
	Text  string `json:"text"`
	Error string `json:"error"`
}

func collate(conversation []message) (string, []*message) {
	var system []string
	var merged []*message
	for i := range conversation {
		m := conversation[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(merged) > 0 && merged[len(merged)-1].Role == m.Role && m.Role != "tool" {
			merged[len(merged)-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	return strings.Join(system, "\n\n"), merged
}

func main() {
	var request struct {
		Template      string      `json:"template"`
		Conversations [][]message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(request.Template))
	results := []rendered{}
	for _, conversation := range request.Conversations {
		system, messages := collate(conversation)
		var out strings.Builder
		err := tmpl.Execute(&out, map[string]any{
			"System": system, "Messages": messages, "Tools": nil, "Response": "", "Think": false, "IsThinkSet": false,
		})
		result := rendered{Text: out.String()}
		if err != nil {
			result.Error = err.Error()
		}
		results = append(results, result)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
